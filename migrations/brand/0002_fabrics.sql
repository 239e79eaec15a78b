-- The brand's live catalog: one row per fabric code (BrandCatalogUpdated).
CREATE TABLE IF NOT EXISTS fabrics (
    code VARCHAR(64) NOT NULL PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    collection VARCHAR(255) NOT NULL,
    colour VARCHAR(128) NOT NULL,
    material VARCHAR(128) NOT NULL,
    width_mm INT NOT NULL,
    price_minor BIGINT NOT NULL,
    currency CHAR(3) NOT NULL,
    discontinued BOOLEAN NOT NULL DEFAULT FALSE,
    revision BIGINT NOT NULL COMMENT 'catalog revision that last wrote this row',
    updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
