-- Which suppliers may read which brands: the catalog processor's fan-out index, a projection of
-- {ns}.brand-access. The authoritative copy per supplier is its own DB's brand_access table.
CREATE TABLE IF NOT EXISTS brand_access (
    brand_id CHAR(36) NOT NULL,
    supplier_id CHAR(36) NOT NULL,
    permissions JSON NOT NULL,
    PRIMARY KEY (brand_id, supplier_id),
    KEY ix_brand_access_supplier (supplier_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
