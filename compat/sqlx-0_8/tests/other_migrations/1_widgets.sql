-- In schema mode, taken out to run once per database; the migrator runs the rest
-- under this file's checksum.
CREATE EXTENSION IF NOT EXISTS citext;
CREATE TABLE widgets (id bigserial PRIMARY KEY, owner text NOT NULL, tag citext);
INSERT INTO widgets (owner, tag) VALUES ('seed', 'Seed');
