INSERT INTO notes (owner, body) VALUES ('seed', 'from the migrations');
