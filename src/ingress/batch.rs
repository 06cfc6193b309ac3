//! Group commit for the request-id store: the claims (and the answers) of requests that arrive
//! together go to the database as one multi-row statement, so a burst costs one round trip and
//! one commit instead of one per request. Each request still waits for its own outcome.

use sqlx::Row as _;
use tokio::sync::{mpsc, oneshot};

use super::store::{Pool, StoreError};

/// Rows per statement: 4 parameters each stays far under both databases' limits.
const MAX_BATCH: usize = 256;

pub(super) struct ClaimRow {
    pub route: String,
    pub request_id: String,
    pub fingerprint: String,
    pub claimed_at: i64,
    /// Whether this row was inserted (the request owns the id).
    pub reply: oneshot::Sender<Result<bool, StoreError>>,
}

pub(super) struct AnswerRow {
    pub route: String,
    pub request_id: String,
    pub status: u16,
    pub body: String,
    /// Who waits for the answer to be stored, if anyone.
    pub reply: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// Starts the two writers on `pool`; they end when every sender is dropped.
pub(super) fn start(pool: Pool) -> (mpsc::Sender<ClaimRow>, mpsc::Sender<AnswerRow>) {
    let (claims, claim_rows) = mpsc::channel(4 * MAX_BATCH);
    let (answers, answer_rows) = mpsc::channel(4 * MAX_BATCH);
    tokio::spawn(write_claims(pool.clone(), claim_rows));
    tokio::spawn(write_answers(pool, answer_rows));
    (claims, answers)
}

/// Waits for one row, then takes what else is already waiting.
async fn next_batch<T>(rows: &mut mpsc::Receiver<T>) -> Option<Vec<T>> {
    let first = rows.recv().await?;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rows.try_recv() {
            Ok(row) => batch.push(row),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// `(p, p, p, p), (p, p, p, p), ...` with `$N` (PostgreSQL) or `?` (SQLite) placeholders;
/// `cast` wraps the column at that index (0-based) in `CAST(... AS INTEGER)`.
fn values(numbered: bool, rows: usize, columns: usize, cast: Option<usize>) -> String {
    let mut text = String::new();
    let mut number = 0;
    for row in 0..rows {
        text.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..columns {
            number += 1;
            if column > 0 {
                text.push_str(", ");
            }
            let placeholder = if numbered {
                format!("${number}")
            } else {
                "?".to_owned()
            };
            if cast == Some(column) {
                text.push_str(&format!("CAST({placeholder} AS INTEGER)"));
            } else {
                text.push_str(&placeholder);
            }
        }
        text.push(')');
    }
    text
}

fn failed(what: &'static str, error: &sqlx::Error) -> StoreError {
    StoreError::Batch {
        what,
        message: error.to_string(),
    }
}

async fn write_claims(pool: Pool, mut rows: mpsc::Receiver<ClaimRow>) {
    while let Some(batch) = next_batch(&mut rows).await {
        // Two copies of one id in a batch: the first may insert, the later ones find it.
        let mut seen = std::collections::HashSet::new();
        let (first, repeated): (Vec<ClaimRow>, Vec<ClaimRow>) = batch
            .into_iter()
            .partition(|row| seen.insert((row.route.clone(), row.request_id.clone())));
        let sql = format!(
            "INSERT INTO cdcflow_ingress_requests (route, request_id, fingerprint, claimed_at) \
             VALUES {} ON CONFLICT DO NOTHING RETURNING route, request_id",
            values(matches!(pool, Pool::Postgres(_)), first.len(), 4, None)
        );
        macro_rules! run {
            ($pool:expr) => {{
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for row in &first {
                    query = query
                        .bind(row.route.as_str())
                        .bind(row.request_id.as_str())
                        .bind(row.fingerprint.as_str())
                        .bind(row.claimed_at);
                }
                query.fetch_all($pool).await.and_then(|inserted| {
                    inserted
                        .iter()
                        .map(|row| Ok((row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?)))
                        .collect::<Result<std::collections::HashSet<_>, sqlx::Error>>()
                })
            }};
        }
        let inserted = match &pool {
            Pool::Sqlite(pool) => run!(pool),
            Pool::Postgres(pool) => run!(pool),
        };
        match inserted {
            Ok(inserted) => {
                for row in first {
                    let owned = inserted.contains(&(row.route, row.request_id));
                    let _ = row.reply.send(Ok(owned));
                }
                for row in repeated {
                    let _ = row.reply.send(Ok(false));
                }
            }
            Err(error) => {
                for row in first.into_iter().chain(repeated) {
                    let _ = row.reply.send(Err(failed("claim", &error)));
                }
            }
        }
    }
}

async fn write_answers(pool: Pool, mut rows: mpsc::Receiver<AnswerRow>) {
    while let Some(batch) = next_batch(&mut rows).await {
        let sql = format!(
            "WITH answered (route, request_id, status, answer) AS (VALUES {}) \
             UPDATE cdcflow_ingress_requests SET status = answered.status, \
             answer = answered.answer FROM answered \
             WHERE cdcflow_ingress_requests.route = answered.route \
             AND cdcflow_ingress_requests.request_id = answered.request_id",
            values(matches!(pool, Pool::Postgres(_)), batch.len(), 4, Some(2))
        );
        macro_rules! run {
            ($pool:expr) => {{
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for row in &batch {
                    query = query
                        .bind(row.route.as_str())
                        .bind(row.request_id.as_str())
                        .bind(i64::from(row.status))
                        .bind(row.body.as_str());
                }
                query.execute($pool).await.map(drop)
            }};
        }
        let done = match &pool {
            Pool::Sqlite(pool) => run!(pool),
            Pool::Postgres(pool) => run!(pool),
        };
        if let Err(error) = &done {
            tracing::error!(%error, rows = batch.len(), "cannot store the answers of written pushes; their ids stay claimed until the claims go stale");
        }
        for row in batch {
            if let Some(reply) = row.reply {
                let _ = reply.send(match &done {
                    Ok(()) => Ok(()),
                    Err(error) => Err(failed("store the answer", error)),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_follow_the_dialect() {
        assert_eq!(values(false, 2, 2, None), "(?, ?), (?, ?)");
        assert_eq!(
            values(true, 2, 3, Some(1)),
            "($1, CAST($2 AS INTEGER), $3), ($4, CAST($5 AS INTEGER), $6)"
        );
    }
}
