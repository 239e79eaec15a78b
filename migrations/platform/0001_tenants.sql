-- The tenant registry: one row per organisation the provisioner has seen.
CREATE TABLE IF NOT EXISTS tenants (
    organisation_id CHAR(36) NOT NULL PRIMARY KEY,
    organisation_type ENUM('BRAND', 'SUPPLIER', 'RETAILER') NOT NULL,
    slug VARCHAR(255) NOT NULL COMMENT 'as received; only valid slugs ever name a database',
    name VARCHAR(255) NOT NULL DEFAULT '',
    database_name VARCHAR(64) NULL COMMENT 'NULL when provisioning was refused',
    status ENUM('provisioning', 'active', 'archived', 'purged', 'failed') NOT NULL,
    migration_version BIGINT NULL,
    failure_reason TEXT NULL,
    created_at DATETIME(3) NOT NULL COMMENT 'occurred_at of OrganisationCreated',
    provisioned_at DATETIME(3) NULL,
    archived_at DATETIME(3) NULL,
    purge_after DATETIME(3) NULL,
    updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    UNIQUE KEY uq_tenants_database (database_name),
    KEY ix_tenants_status (status, purge_after)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
