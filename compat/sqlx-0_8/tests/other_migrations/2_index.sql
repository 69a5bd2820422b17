CREATE INDEX widgets_owner ON widgets (owner);
