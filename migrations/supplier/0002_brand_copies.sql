-- Brands this supplier may read, and with which permissions (SupplierBrandAccessGranted/Revoked).
CREATE TABLE IF NOT EXISTS brand_access (
    brand_id CHAR(36) NOT NULL PRIMARY KEY,
    permissions JSON NOT NULL,
    granted_at DATETIME(3) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Local copy of the catalogs of brands the supplier may read. Prices are NULL unless the
-- supplier holds pricing.read for that brand.
CREATE TABLE IF NOT EXISTS brand_fabrics (
    brand_id CHAR(36) NOT NULL,
    code VARCHAR(64) NOT NULL,
    name VARCHAR(255) NOT NULL,
    collection VARCHAR(255) NOT NULL,
    colour VARCHAR(128) NOT NULL,
    material VARCHAR(128) NOT NULL,
    width_mm INT NOT NULL,
    price_minor BIGINT NULL,
    currency CHAR(3) NULL,
    discontinued BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (brand_id, code)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
