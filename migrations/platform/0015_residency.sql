-- Data residency: the region an organisation asked its data to stay in (OrganisationCreated's
-- optional `region`), NULL when it asked for none. Placement and moves keep a tenant on servers
-- of its region (TENANCY_SERVER_REGIONS). Portable and safe to run again (see 0004).
SET @residency = (SELECT IF(COUNT(*) = 0,
    'ALTER TABLE tenants ADD COLUMN region VARCHAR(32) NULL COMMENT ''the region its data must stay in; NULL: any''',
    'DO 0')
    FROM information_schema.COLUMNS
    WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'tenants' AND COLUMN_NAME = 'region');
PREPARE residency FROM @residency;
EXECUTE residency;
DEALLOCATE PREPARE residency;
