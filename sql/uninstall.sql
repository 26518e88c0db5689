-- Remove gancho from a database: the triggers on every watched table, then the
-- gancho schema with its outbox, events, deliveries and attempts.
--
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/uninstall.sql

do $$
declare
    watched_source text;
begin
    if to_regclass('gancho.watched') is not null then
        for watched_source in select source from gancho.watched loop
            perform gancho.unwatch(watched_source);
        end loop;
    end if;
end
$$;

drop schema if exists gancho cascade;
