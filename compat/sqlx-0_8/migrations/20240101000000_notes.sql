CREATE TABLE notes (
    id bigserial PRIMARY KEY,
    owner text NOT NULL,
    body text NOT NULL
);
CREATE INDEX notes_owner ON notes (owner);
