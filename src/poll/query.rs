//! The SQL of a PostgreSQL poll, as text: pure, so its shape is tested without a database.
//!
//! A poll reads the rows after the cursor, in (cursor column, key) order, one page at a time,
//! and only rows whose cursor value is below the **horizon**: the start of the oldest
//! transaction still open (or now, less a grace period, if that is earlier). A transaction's
//! rows carry a cursor value at or after its start (`now()` or `clock_timestamp()` when it
//! writes), so a row below the horizon can no longer appear: none is missed when a long
//! transaction commits rows older than rows already read, and the cursor never has to move
//! back. The price is that a long transaction holds the poll back until it ends.

/// A table's poll, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollTable {
    /// `schema.table` or `table`.
    pub table: String,
    /// The cursor column (`updated_at`) and its SQL type (`timestamptz`).
    pub cursor: (String, String),
    /// The primary key columns with their types, for ties and as the Kafka key.
    pub key: Vec<(String, String)>,
    pub page_size: usize,
}

/// `"name"`, with quotes doubled; `schema.table` quotes each part.
pub fn quote_identifier(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

impl PollTable {
    /// The page after the cursor and below the horizon. Parameters: `$1` the horizon, then, when
    /// `resume`, the cursor value and the key values of the last row read. Each row comes as
    /// `row` (the row as JSON text), `cursor` (the cursor value as text) and `ts_ms` (the
    /// cursor as epoch milliseconds).
    pub fn page_sql(&self, resume: bool) -> String {
        let (cursor, cursor_type) = &self.cursor;
        let cursor = format!("t.{}", quote_identifier(cursor));
        let keys: Vec<String> = self
            .key
            .iter()
            .map(|(name, _)| format!("t.{}", quote_identifier(name)))
            .collect();
        let mut conditions = vec![format!("{cursor} < $1::{cursor_type}")];
        if resume {
            let columns = std::iter::once(cursor.clone())
                .chain(keys.iter().cloned())
                .collect::<Vec<_>>()
                .join(", ");
            let parameters = std::iter::once(cursor_type)
                .chain(self.key.iter().map(|(_, kind)| kind))
                .enumerate()
                .map(|(index, kind)| format!("${}::{kind}", index + 2))
                .collect::<Vec<_>>()
                .join(", ");
            conditions.push(format!("({columns}) > ({parameters})"));
        }
        let order = std::iter::once(cursor.clone())
            .chain(keys)
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "SELECT row_to_json(t)::text AS row, {cursor}::text AS cursor, \
             floor(extract(epoch FROM {cursor}) * 1000)::bigint AS ts_ms FROM {} AS t \
             WHERE {} ORDER BY {order} LIMIT {}",
            quote_identifier(&self.table),
            conditions.join(" AND "),
            self.page_size
        )
    }

    /// The horizon: the start of the oldest transaction open in the database (any other
    /// session's, written yet or not: one that has not written yet may still write rows
    /// stamped with its start), or now less `grace`, whichever is earlier. Returns the
    /// horizon as text of the cursor's type, then `now()` and the horizon as epoch
    /// milliseconds. The horizon is truncated to the millisecond, so that the rows of one
    /// millisecond (one `__source_ts_ms`) are read in one poll. `pg_stat_activity` shows
    /// other roles' transactions to a role with `pg_read_all_stats` (or a superuser); without
    /// it only the grace period protects.
    pub fn horizon_sql(&self, grace_ms: u64) -> String {
        format!(
            "WITH h AS (SELECT date_trunc('milliseconds', LEAST(now() - interval '{grace_ms} \
             milliseconds', COALESCE((SELECT min(xact_start) FROM pg_stat_activity \
             WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() \
             AND datname = current_database() AND backend_type = 'client backend'), now()))) \
             AS at) \
             SELECT at::{}::text, floor(extract(epoch FROM now()) * 1000)::bigint, \
             floor(extract(epoch FROM at) * 1000)::bigint FROM h",
            self.cursor.1
        )
    }
}

/// The SQL of a SQLite poll. SQLite has no view of open transactions, and needs none: it lets
/// one writer at a time commit, so rows stamped while writing (a trigger, `CURRENT_TIMESTAMP`,
/// `unixepoch()`) commit in cursor order. The horizon is `now()` less the grace period, which
/// covers ties within the column's resolution (a second for `CURRENT_TIMESTAMP`) and a stamp
/// taken a moment before the write lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlitePollTable {
    pub table: String,
    pub cursor: String,
    pub key: Vec<String>,
    pub page_size: usize,
}

impl SqlitePollTable {
    /// The latest cursor value: the horizon is written like it.
    pub fn latest_sql(&self) -> String {
        let cursor = quote_identifier(&self.cursor);
        format!(
            "SELECT {cursor} FROM {} WHERE {cursor} IS NOT NULL ORDER BY {cursor} DESC LIMIT 1",
            quote_identifier(&self.table)
        )
    }

    /// The page after the cursor and below the horizon: `?1` the horizon, then, when
    /// `resume`, the cursor value and the key values of the last row read.
    pub fn page_sql(&self, resume: bool) -> String {
        let columns: Vec<String> = std::iter::once(&self.cursor)
            .chain(&self.key)
            .map(|name| quote_identifier(name))
            .collect();
        let mut condition = format!("{} < ?1", columns[0]);
        if resume {
            let parameters: Vec<String> = (0..columns.len())
                .map(|index| format!("?{}", index + 2))
                .collect();
            condition.push_str(&format!(
                " AND ({}) > ({})",
                columns.join(", "),
                parameters.join(", ")
            ));
        }
        format!(
            "SELECT * FROM {} WHERE {condition} ORDER BY {} LIMIT {}",
            quote_identifier(&self.table),
            columns.join(", "),
            self.page_size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orders() -> PollTable {
        PollTable {
            table: "public.orders".to_owned(),
            cursor: ("updated_at".to_owned(), "timestamptz".to_owned()),
            key: vec![("id".to_owned(), "bigint".to_owned())],
            page_size: 500,
        }
    }

    #[test]
    fn the_first_page_is_bounded_by_the_horizon_only() {
        assert_eq!(
            orders().page_sql(false),
            "SELECT row_to_json(t)::text AS row, t.\"updated_at\"::text AS cursor, \
             floor(extract(epoch FROM t.\"updated_at\") * 1000)::bigint AS ts_ms FROM \
             \"public\".\"orders\" AS t WHERE t.\"updated_at\" < $1::timestamptz ORDER BY \
             t.\"updated_at\", t.\"id\" LIMIT 500"
        );
    }

    #[test]
    fn a_resumed_page_starts_after_the_last_row_with_the_key_breaking_ties() {
        let mut table = orders();
        table.key.push(("line".to_owned(), "integer".to_owned()));
        let sql = table.page_sql(true);
        assert!(
            sql.contains(
                "(t.\"updated_at\", t.\"id\", t.\"line\") > ($2::timestamptz, $3::bigint, \
                 $4::integer)"
            ),
            "{sql}"
        );
        assert!(sql.ends_with("ORDER BY t.\"updated_at\", t.\"id\", t.\"line\" LIMIT 500"));
    }

    #[test]
    fn a_sqlite_page_uses_row_values_below_the_horizon() {
        let table = SqlitePollTable {
            table: "orders".to_owned(),
            cursor: "updated_at".to_owned(),
            key: vec!["id".to_owned()],
            page_size: 100,
        };
        assert_eq!(
            table.page_sql(true),
            "SELECT * FROM \"orders\" WHERE \"updated_at\" < ?1 AND (\"updated_at\", \"id\") > \
             (?2, ?3) ORDER BY \"updated_at\", \"id\" LIMIT 100"
        );
        assert!(
            table
                .page_sql(false)
                .contains("WHERE \"updated_at\" < ?1 ORDER BY")
        );
        assert!(
            table
                .latest_sql()
                .ends_with("ORDER BY \"updated_at\" DESC LIMIT 1")
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_identifier("s.t"), "\"s\".\"t\"");
        assert!(
            orders()
                .horizon_sql(2_000)
                .contains("interval '2000 milliseconds'")
        );
    }
}
