CREATE TABLE gadgets (widget_id bigint REFERENCES widgets (id));
