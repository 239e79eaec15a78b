-- The order lifecycle events of an organisation were applied in (its log's order: one
-- organisation's events are on one partition, applied one after another). A tenant's archived
-- periods are read from this log sorted by event time; a restore and a termination stamped in
-- the same millisecond were sorted by chance, and the wrong order dropped an archived period
-- from the tenant's history: events inside it then applied where the live run had skipped them
-- (one run of the chaos test against its clean replay). `seq` breaks such ties.
-- Portable and safe to run again (see 0004).
SET @log_order = (SELECT IF(COUNT(*) = 0,
    'ALTER TABLE lifecycle_log ADD COLUMN seq BIGINT NOT NULL AUTO_INCREMENT UNIQUE',
    'DO 0')
    FROM information_schema.COLUMNS
    WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'lifecycle_log' AND COLUMN_NAME = 'seq');
PREPARE log_order FROM @log_order;
EXECUTE log_order;
DEALLOCATE PREPARE log_order;
