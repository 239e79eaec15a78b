-- Which retailer each custom host belongs to (the domains processor writes it in the same
-- transaction as the retailer's own `domains` row): host → tenant resolution reads it, and a
-- host can belong to one retailer only.
CREATE TABLE IF NOT EXISTS retailer_domains (
    host VARCHAR(253) NOT NULL PRIMARY KEY,
    retailer_id CHAR(36) NOT NULL,
    assigned_at DATETIME(3) NOT NULL,
    KEY ix_retailer_domains_retailer (retailer_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
