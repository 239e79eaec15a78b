-- Fabric codes removed from the catalog, with the revision that removed them: an older
-- BrandCatalogUpdated (a dead-letter replay, a late retry) cannot bring a removed fabric back.
CREATE TABLE IF NOT EXISTS removed_fabrics (
    code VARCHAR(64) NOT NULL PRIMARY KEY,
    revision BIGINT NOT NULL COMMENT 'catalog revision that removed it'
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
