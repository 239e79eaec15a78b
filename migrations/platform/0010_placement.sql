-- Which MySQL server each tenant's database is on (a name from the servers list; `home` is
-- DATABASE_URL's). Written once, when the row is first inserted, and never changed: the
-- tenant's archive, rebuild shadow and kept old copy live on the same server.
ALTER TABLE tenants
    ADD COLUMN IF NOT EXISTS server VARCHAR(32) NOT NULL DEFAULT 'home'
        COMMENT 'the server the tenant database is on; see src/servers.rs';
