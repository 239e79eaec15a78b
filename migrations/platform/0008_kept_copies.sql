-- Tables a `tenancy rebuild` replaced, kept in `{ns}_old_{id}` for `--rollback` until
-- `kept_until` (`--keep-old`); then a worker's purge timer drops them.
CREATE TABLE IF NOT EXISTS kept_copies (
    organisation_id CHAR(36) NOT NULL PRIMARY KEY,
    kept_until DATETIME(3) NOT NULL,
    KEY ix_kept_copies_until (kept_until)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
