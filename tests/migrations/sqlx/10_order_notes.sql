-- Version 10 after 2 (not file-name order, where "10_" sorts before "2_"): it needs
-- the orders table of version 2.
ALTER TABLE orders ADD COLUMN note text;
CREATE FUNCTION order_count(account bigint) RETURNS bigint
    LANGUAGE sql STABLE
    AS $$ SELECT count(*) FROM orders WHERE account_id = account $$;
INSERT INTO accounts (name) VALUES ('seeded by a migration');
