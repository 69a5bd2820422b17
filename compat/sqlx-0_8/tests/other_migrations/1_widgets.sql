CREATE TABLE widgets (id bigserial PRIMARY KEY, owner text NOT NULL);
INSERT INTO widgets (owner) VALUES ('seed');
