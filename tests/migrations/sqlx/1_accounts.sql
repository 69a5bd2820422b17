-- The first migration: a table and an index.
CREATE TABLE accounts (
    id bigserial PRIMARY KEY,
    name text NOT NULL
);
CREATE INDEX accounts_name ON accounts (name);
