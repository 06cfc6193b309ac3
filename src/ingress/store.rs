//! Processed request ids, in a database through sqlx: PostgreSQL when several ingress
//! instances share it, SQLite as the embedded default.
//!
//! A request id is claimed by inserting its row (`INSERT ... ON CONFLICT DO NOTHING`): the
//! database decides which of two concurrent copies owns it, on one instance or several. The
//! owner writes the record to Kafka and then stores the answer; a copy that finds the answer
//! replays it, one that finds the claim still open waits for it. A claim whose owner died is
//! taken over once it is older than `stale_after`; a claim whose write failed is released, so
//! the sender's retry is written.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Row as _;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use super::batch::{self, AnswerRow, ClaimRow};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "config key `ingress.database_url`: `{url}` is neither postgres://... nor sqlite://...; \
         name the database that keeps processed request ids"
    )]
    UnknownScheme { url: String },
    #[error("config key `ingress.database_url`: cannot open {url}: {source}")]
    Open {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("the request-id database failed ({what}): {message}")]
    Batch { what: &'static str, message: String },
    #[error("the request-id database failed ({what}): {source}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

/// The answer stored for a request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub body: String,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This request owns the id: write, then [`RequestStore::finish`] or
    /// [`RequestStore::release`].
    Owned,
    /// Processed before: answer the same.
    Answered {
        answer: StoredAnswer,
        fingerprint: String,
    },
    /// Another copy is being written now.
    InProgress { fingerprint: String },
}

#[derive(Debug, Clone)]
pub(super) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

#[derive(Debug, Clone)]
pub struct RequestStore {
    pool: Pool,
    /// The group-commit writers of claims and answers ([`super::batch`]).
    claims: mpsc::Sender<ClaimRow>,
    answers: mpsc::Sender<AnswerRow>,
}

const CREATE: &str = "CREATE TABLE IF NOT EXISTS cdcflow_ingress_requests (
    route TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    claimed_at BIGINT NOT NULL,
    status INTEGER,
    answer TEXT,
    PRIMARY KEY (route, request_id)
)";
const LOOK: Sql = Sql {
    postgres: "SELECT fingerprint, claimed_at, status, answer FROM cdcflow_ingress_requests
    WHERE route = $1 AND request_id = $2",
    sqlite: "SELECT fingerprint, claimed_at, status, answer FROM cdcflow_ingress_requests
    WHERE route = ?1 AND request_id = ?2",
};
const TAKE_OVER: Sql = Sql {
    postgres: "UPDATE cdcflow_ingress_requests SET claimed_at = $3, fingerprint = $4
    WHERE route = $1 AND request_id = $2 AND status IS NULL AND claimed_at = $5",
    sqlite: "UPDATE cdcflow_ingress_requests SET claimed_at = ?3, fingerprint = ?4
    WHERE route = ?1 AND request_id = ?2 AND status IS NULL AND claimed_at = ?5",
};
const RELEASE: Sql = Sql {
    postgres: "DELETE FROM cdcflow_ingress_requests
    WHERE route = $1 AND request_id = $2 AND status IS NULL",
    sqlite: "DELETE FROM cdcflow_ingress_requests
    WHERE route = ?1 AND request_id = ?2 AND status IS NULL",
};
const EXPIRE: Sql = Sql {
    postgres: "DELETE FROM cdcflow_ingress_requests WHERE claimed_at < $1",
    sqlite: "DELETE FROM cdcflow_ingress_requests WHERE claimed_at < ?1",
};

/// One statement in each dialect (SQLite numbers its parameters `?N`).
#[derive(Debug, Clone, Copy)]
struct Sql {
    postgres: &'static str,
    sqlite: &'static str,
}

fn writer_gone(what: &'static str) -> StoreError {
    StoreError::Batch {
        what,
        message: "the store's writer stopped".to_owned(),
    }
}

fn query_error(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

/// One row as read back.
struct Found {
    fingerprint: String,
    claimed_at: i64,
    answer: Option<StoredAnswer>,
}

impl RequestStore {
    /// Opens (and creates) the table. SQLite gets one connection: its writes are serial
    /// anyway, and one writer never waits on a lock.
    pub async fn open(url: &str, pool_size: u32) -> Result<RequestStore, StoreError> {
        let open_error = |source| StoreError::Open {
            url: url.to_owned(),
            source,
        };
        let pool = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(pool_size.max(1))
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await
                    .map_err(open_error)?,
            )
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(open_error)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5));
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await
                    .map_err(open_error)?,
            )
        } else {
            return Err(StoreError::UnknownScheme {
                url: url.to_owned(),
            });
        };
        let (claims, answers) = batch::start(pool.clone());
        let store = RequestStore {
            pool,
            claims,
            answers,
        };
        let create = Sql {
            postgres: CREATE,
            sqlite: CREATE,
        };
        store.execute(create, &[], "create the table").await?;
        Ok(store)
    }

    /// Runs a statement of text and integer parameters; the rows it touched.
    async fn execute(
        &self,
        sql: Sql,
        parameters: &[Parameter<'_>],
        what: &'static str,
    ) -> Result<u64, StoreError> {
        // The two pools are different types: one body, written once, for each.
        macro_rules! run {
            ($sql:expr, $pool:expr) => {{
                let mut query = sqlx::query($sql);
                for parameter in parameters {
                    query = match *parameter {
                        Parameter::Text(text) => query.bind(text),
                        Parameter::Int(number) => query.bind(number),
                    };
                }
                let done = query.execute($pool).await.map_err(query_error(what))?;
                done.rows_affected()
            }};
        }
        Ok(match &self.pool {
            Pool::Sqlite(pool) => run!(sql.sqlite, pool),
            Pool::Postgres(pool) => run!(sql.postgres, pool),
        })
    }

    async fn look(&self, route: &str, request_id: &str) -> Result<Option<Found>, StoreError> {
        macro_rules! read {
            ($row:expr) => {{
                let row = $row;
                let status: Option<i32> = row.try_get("status").map_err(query_error("read"))?;
                let answer: Option<String> = row.try_get("answer").map_err(query_error("read"))?;
                Found {
                    fingerprint: row.try_get("fingerprint").map_err(query_error("read"))?,
                    claimed_at: row.try_get("claimed_at").map_err(query_error("read"))?,
                    answer: status.map(|status| StoredAnswer {
                        status: u16::try_from(status).unwrap_or(500),
                        body: answer.unwrap_or_default(),
                    }),
                }
            }};
        }
        macro_rules! look {
            ($sql:expr, $pool:expr) => {{
                let row = sqlx::query($sql)
                    .bind(route)
                    .bind(request_id)
                    .fetch_optional($pool)
                    .await
                    .map_err(query_error("look up"))?;
                match row {
                    Some(row) => Some(read!(row)),
                    None => None,
                }
            }};
        }
        Ok(match &self.pool {
            Pool::Sqlite(pool) => look!(LOOK.sqlite, pool),
            Pool::Postgres(pool) => look!(LOOK.postgres, pool),
        })
    }

    /// Claims `request_id` on `route`, or says who has it.
    pub async fn claim(
        &self,
        route: &str,
        request_id: &str,
        fingerprint: &str,
        now_ms: i64,
        stale_after: Duration,
    ) -> Result<Claim, StoreError> {
        // A claim released between the insert and the look-up is claimed again.
        for _ in 0..3 {
            let (reply, owned) = oneshot::channel();
            self.claims
                .send(ClaimRow {
                    route: route.to_owned(),
                    request_id: request_id.to_owned(),
                    fingerprint: fingerprint.to_owned(),
                    claimed_at: now_ms,
                    reply,
                })
                .await
                .map_err(|_| writer_gone("claim"))?;
            let inserted = owned.await.map_err(|_| writer_gone("claim"))??;
            if inserted {
                return Ok(Claim::Owned);
            }
            let Some(found) = self.look(route, request_id).await? else {
                continue;
            };
            if let Some(answer) = found.answer {
                return Ok(Claim::Answered {
                    answer,
                    fingerprint: found.fingerprint,
                });
            }
            let stale_ms = i64::try_from(stale_after.as_millis()).unwrap_or(i64::MAX);
            if found.claimed_at < now_ms.saturating_sub(stale_ms) {
                let taken = self
                    .execute(
                        TAKE_OVER,
                        &[
                            Parameter::Text(route),
                            Parameter::Text(request_id),
                            Parameter::Int(now_ms),
                            Parameter::Text(fingerprint),
                            Parameter::Int(found.claimed_at),
                        ],
                        "take over a stale claim",
                    )
                    .await?;
                if taken == 1 {
                    return Ok(Claim::Owned);
                }
                continue;
            }
            return Ok(Claim::InProgress {
                fingerprint: found.fingerprint,
            });
        }
        Ok(Claim::InProgress {
            fingerprint: fingerprint.to_owned(),
        })
    }

    /// Stores the answer of an owned claim, and waits until it is stored.
    pub async fn finish(
        &self,
        route: &str,
        request_id: &str,
        answer: &StoredAnswer,
    ) -> Result<(), StoreError> {
        let (reply, stored) = oneshot::channel();
        self.queue_answer(route, request_id, answer, Some(reply))
            .await?;
        stored.await.map_err(|_| writer_gone("store the answer"))?
    }

    /// Queues the answer of an owned claim for the next group commit, without waiting for
    /// it: the push's record is in Kafka already. Until it is stored a copy waits for it as
    /// for a claim in progress; if the process dies first, the claim goes stale and a later
    /// copy is written again (the pipeline's version gate drops it).
    pub async fn finish_later(
        &self,
        route: &str,
        request_id: &str,
        answer: &StoredAnswer,
    ) -> Result<(), StoreError> {
        self.queue_answer(route, request_id, answer, None).await
    }

    async fn queue_answer(
        &self,
        route: &str,
        request_id: &str,
        answer: &StoredAnswer,
        reply: Option<oneshot::Sender<Result<(), StoreError>>>,
    ) -> Result<(), StoreError> {
        self.answers
            .send(AnswerRow {
                route: route.to_owned(),
                request_id: request_id.to_owned(),
                status: answer.status,
                body: answer.body.clone(),
                reply,
            })
            .await
            .map_err(|_| writer_gone("store the answer"))
    }

    /// Gives up an owned claim whose write failed.
    pub async fn release(&self, route: &str, request_id: &str) -> Result<(), StoreError> {
        self.execute(
            RELEASE,
            &[Parameter::Text(route), Parameter::Text(request_id)],
            "release a claim",
        )
        .await
        .map(drop)
    }

    /// Forgets ids claimed before `before_ms`; the rows removed.
    pub async fn expire(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.execute(EXPIRE, &[Parameter::Int(before_ms)], "expire old ids")
            .await
    }

    /// Whether the store is shared by instances (PostgreSQL).
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Parameter<'a> {
    Text(&'a str),
    Int(i64),
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_secs(30);

    async fn memory() -> RequestStore {
        RequestStore::open("sqlite::memory:", 1).await.unwrap()
    }

    #[tokio::test]
    async fn the_first_copy_owns_a_later_one_replays_the_answer() {
        let store = memory().await;
        assert_eq!(
            store.claim("/o", "r1", "f1", 1_000, STALE).await.unwrap(),
            Claim::Owned
        );
        assert_eq!(
            store.claim("/o", "r1", "f1", 1_001, STALE).await.unwrap(),
            Claim::InProgress {
                fingerprint: "f1".into()
            }
        );
        let answer = StoredAnswer {
            status: 202,
            body: "{\"offset\":7}".into(),
        };
        store.finish("/o", "r1", &answer).await.unwrap();
        assert_eq!(
            store.claim("/o", "r1", "f2", 1_002, STALE).await.unwrap(),
            Claim::Answered {
                answer,
                fingerprint: "f1".into()
            }
        );
        // The same id on another route is another request.
        assert_eq!(
            store.claim("/p", "r1", "f1", 1_003, STALE).await.unwrap(),
            Claim::Owned
        );
    }

    #[tokio::test]
    async fn a_released_claim_is_claimed_again_and_a_stale_one_taken_over() {
        let store = memory().await;
        assert_eq!(
            store.claim("/o", "r", "f", 0, STALE).await.unwrap(),
            Claim::Owned
        );
        store.release("/o", "r").await.unwrap();
        assert_eq!(
            store.claim("/o", "r", "f", 10, STALE).await.unwrap(),
            Claim::Owned
        );
        // Its owner died: within `stale_after` the claim holds, after it is taken over once.
        assert!(matches!(
            store.claim("/o", "r", "f", 20_000, STALE).await.unwrap(),
            Claim::InProgress { .. }
        ));
        assert_eq!(
            store.claim("/o", "r", "f", 40_011, STALE).await.unwrap(),
            Claim::Owned
        );
        assert!(matches!(
            store.claim("/o", "r", "f", 40_012, STALE).await.unwrap(),
            Claim::InProgress { .. }
        ));
    }

    #[tokio::test]
    async fn ids_expire_after_the_retention() {
        let store = memory().await;
        store.claim("/o", "old", "f", 1_000, STALE).await.unwrap();
        store.claim("/o", "new", "f", 5_000, STALE).await.unwrap();
        assert_eq!(store.expire(2_000).await.unwrap(), 1);
        assert_eq!(
            store.claim("/o", "old", "f", 6_000, STALE).await.unwrap(),
            Claim::Owned
        );
        assert_eq!(store.backend(), "sqlite");
    }

    #[tokio::test]
    async fn an_unknown_scheme_names_the_key() {
        let error = RequestStore::open("mysql://x", 1).await.unwrap_err();
        assert!(
            error.to_string().contains("ingress.database_url"),
            "{error}"
        );
    }
}
