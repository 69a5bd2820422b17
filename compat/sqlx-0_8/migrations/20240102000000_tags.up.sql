CREATE TABLE tags (note_id bigint REFERENCES notes (id), tag text NOT NULL);
