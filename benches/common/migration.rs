//! The migrations the benches write: a project's schema as a migration tool keeps it.

/// Migration `i` of a realistic migrations folder (`benches/sqlx_test.rs`,
/// `benches/process.rs`): each adds a table with an index and seed rows, every third a
/// function, every fifth alters an earlier table.
pub fn migration(i: usize) -> String {
    let mut sql = format!(
        "CREATE TABLE t{i} (\n    id bigserial PRIMARY KEY,\n    name text NOT NULL,\n    \
         amount numeric NOT NULL DEFAULT 0,\n    created_at timestamptz NOT NULL DEFAULT now()\n);\n\
         CREATE INDEX t{i}_name ON t{i} (name);\n\
         INSERT INTO t{i} (name, amount) SELECT 'seed ' || g, g FROM generate_series(1, 50) g;\n"
    );
    if i.is_multiple_of(3) {
        sql.push_str(&format!(
            "CREATE FUNCTION t{i}_total() RETURNS numeric LANGUAGE sql STABLE AS $$ SELECT coalesce(sum(amount), 0) FROM t{i} $$;\n"
        ));
    }
    if i.is_multiple_of(5) && i > 1 {
        sql.push_str(&format!(
            "ALTER TABLE t{} ADD COLUMN t{i}_id bigint REFERENCES t{i} (id);\n",
            i - 1
        ));
    }
    sql
}
