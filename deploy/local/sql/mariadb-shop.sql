-- The example shop's tables for MariaDB (same shape as postgres-shop.sql).
-- Idempotent: load it again at any time (no DROP, seeds skipped when present):
--   deploy/local/mariadb.sh mysql < deploy/local/sql/mariadb-shop.sql
-- Types chosen to meet the Postgres encodings where Debezium allows: DECIMAL as
-- string (decimal.handling.mode=string), TIMESTAMP(6) as an ISO-8601 UTC string
-- (like timestamptz), DATETIME(6) as epoch microseconds (like timestamp), DATE as
-- epoch days.

CREATE TABLE IF NOT EXISTS customers (
    id           BIGINT        NOT NULL AUTO_INCREMENT PRIMARY KEY,
    email        VARCHAR(320)  NOT NULL,
    name         VARCHAR(200),
    credit_limit DECIMAL(10,2) NOT NULL DEFAULT 0,
    birth_date   DATE,
    updated_at   DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    notes        MEDIUMTEXT
) ENGINE = InnoDB AUTO_INCREMENT = 9;

CREATE TABLE IF NOT EXISTS orders (
    id          BIGINT        NOT NULL AUTO_INCREMENT PRIMARY KEY,
    customer_id BIGINT,
    status      VARCHAR(16)   NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'paid', 'shipped', 'cancelled')),
    amount      DECIMAL(10,2) NOT NULL,
    created_at  TIMESTAMP(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB AUTO_INCREMENT = 1001;

-- Pre-existing rows: the connector's initial snapshot (op "r").
INSERT IGNORE INTO customers (id, email, name, credit_limit, birth_date, updated_at)
VALUES (7, 'ada@example.com', 'Ada', 5000.00, '1815-12-10', '2024-11-24 17:00:00'),
       (8, 'alan@example.com', 'Alan', 1500.00, '1912-06-23', '2024-11-24 17:00:00');

INSERT IGNORE INTO orders (id, customer_id, status, amount, created_at)
VALUES (1000, 7, 'shipped', 42.00, '2024-11-24 17:00:00');
