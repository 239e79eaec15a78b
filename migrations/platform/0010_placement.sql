-- Which MySQL server each tenant's database is on (a name from the servers list; `home` is
-- DATABASE_URL's). Written when the row is first inserted; a move (`tenancy rebuild
-- --to-server`) changes it. The tenant's archive, rebuild shadow and kept old copy live on the
-- same server. Portable and safe to run again (see 0004).
SET @placement = (SELECT IF(COUNT(*) = 0,
    'ALTER TABLE tenants ADD COLUMN server VARCHAR(32) NOT NULL DEFAULT ''home'' COMMENT ''the server the tenant database is on; see src/store/servers.rs''',
    'DO 0')
    FROM information_schema.COLUMNS
    WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'tenants' AND COLUMN_NAME = 'server');
PREPARE placement FROM @placement;
EXECUTE placement;
DEALLOCATE PREPARE placement;
