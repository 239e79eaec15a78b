-- The audit trail of a tenant's lifecycle: who terminated, restored or purged it, why, when the
-- platform applied it, and the time its event claimed when that was not believed (see
-- `tenancy::clock`). `lifecycle_log` survives the purge: it holds no tenant data.
-- Written for MySQL 8.4 and MariaDB 10.11 alike (no MariaDB-only column clause), and safe to run
-- again after a crash half-way: the ALTER runs only if its first column is missing.
SET @audit = (SELECT IF(COUNT(*) = 0,
    'ALTER TABLE lifecycle_log ADD COLUMN actor VARCHAR(255) NULL, ADD COLUMN reason TEXT NULL, ADD COLUMN claimed_at DATETIME(3) NULL, ADD COLUMN applied_at DATETIME(3) NULL',
    'DO 0')
    FROM information_schema.COLUMNS
    WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'lifecycle_log' AND COLUMN_NAME = 'actor');
PREPARE audit FROM @audit;
EXECUTE audit;
DEALLOCATE PREPARE audit;
