-- Host names that resolve to this retailer (RetailerDomainAssigned/Removed).
CREATE TABLE IF NOT EXISTS domains (
    domain VARCHAR(253) NOT NULL PRIMARY KEY,
    assigned_at DATETIME(3) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
