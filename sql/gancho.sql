-- gancho capture schema, version 1.
--
-- Running this file more than once is safe: every statement creates what is
-- missing and replaces the functions. It needs no superuser and no extension,
-- only the CREATE privilege on the database. Watching a table with
-- gancho.watch() needs ownership of that table.
--
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/gancho.sql
--   psql "$DATABASE_URL" -c "select gancho.watch('stock', 'public.spree_stock_items', '{id}', '{variant_id,count_on_hand}')"
--
-- PostgreSQL 13 or later is required (gen_random_uuid and xid8 are built in from 13 on).

create schema if not exists gancho;

create table if not exists gancho.meta (
    key text primary key,
    value text not null
);

insert into gancho.meta (key, value) values ('schema_version', '1')
on conflict (key) do update set value = excluded.value;

-- One row per watched table and source name, so that uninstall and
-- `gancho check` know which triggers exist.
create table if not exists gancho.watched (
    source text primary key,
    table_schema text not null,
    table_name text not null,
    key_columns text[] not null,
    columns text[] not null,
    installed_at timestamptz not null default now()
);

alter table gancho.watched add column if not exists fire_always boolean not null default false;

-- The outbox: one row per captured change, written inside the shop's own
-- transaction. It is the durable record; NOTIFY only wakes the sidecar.
create table if not exists gancho.outbox (
    id bigint generated always as identity primary key,
    source text not null,
    table_name text not null,
    operation text not null,
    key jsonb,
    old jsonb,
    new jsonb,
    transaction_id xid8 not null default pg_current_xact_id(),
    changed_at timestamptz not null default clock_timestamp(),
    processed_at timestamptz
);

-- Keeps the claim of unprocessed changes an index scan however much
-- processed history the table holds.
create index if not exists outbox_unprocessed on gancho.outbox (id) where processed_at is null;
-- Lets retention find old processed rows without reading the whole table.
create index if not exists outbox_processed on gancho.outbox (processed_at) where processed_at is not null;

-- Per-rule, per-row memory, used by threshold rules with a rearm level.
create table if not exists gancho.rule_state (
    rule text not null,
    key jsonb not null,
    state text not null,
    updated_at timestamptz not null default now(),
    primary key (rule, key)
);

-- One row per rule match: the event that endpoints receive.
create table if not exists gancho.event (
    id bigint generated always as identity primary key,
    outbox_id bigint not null,
    rule text not null,
    type text not null,
    data jsonb not null,
    occurred_at timestamptz not null,
    created_at timestamptz not null default now()
);

create index if not exists event_outbox on gancho.event (outbox_id);
create index if not exists event_created on gancho.event (created_at);

-- One row per event and endpoint. The webhook_id is fixed at creation and
-- sent unchanged on every attempt, so receivers can deduplicate on it.
create table if not exists gancho.delivery (
    id bigint generated always as identity primary key,
    event_id bigint not null references gancho.event (id) on delete cascade,
    endpoint text not null,
    webhook_id text not null default ('msg_' || replace(gen_random_uuid()::text, '-', '')),
    ordering_key text,
    status text not null default 'pending' check (status in ('pending', 'delivered', 'dead')),
    attempts integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    lease_until timestamptz,
    created_at timestamptz not null default now(),
    finished_at timestamptz,
    last_error text
);

create index if not exists delivery_due on gancho.delivery (endpoint, next_attempt_at, id) where status = 'pending';
-- Finds whether an earlier delivery of the same source row still waits, for
-- endpoints that receive each row's deliveries in order.
create index if not exists delivery_pending_key on gancho.delivery (endpoint, ordering_key, id) where status = 'pending';
create index if not exists delivery_dead on gancho.delivery (endpoint, id) where status = 'dead';
create index if not exists delivery_event on gancho.delivery (event_id);
-- webhook_id contains 122 random bits from gen_random_uuid(), so a collision
-- is as unlikely as for any version 4 UUID. Earlier schemas also had a unique
-- index on it, which every insert and outcome updated at a random place.
alter table gancho.delivery drop constraint if exists delivery_webhook_id_key;
-- A claim sets only columns that no index covers (lease_until, attempts),
-- so Postgres can write it as a heap-only update, without a new entry in
-- each index, when the row's page has room for the new version.
-- Deliveries are claimed soon after they are inserted, while the last pages
-- would otherwise be full. Half of each page is left free for that.
alter table gancho.delivery set (fillfactor = 50);

-- The health of each endpoint, shared by all sidecars: consecutive failures,
-- a pause while the circuit breaker is open, and why it was disabled.
create table if not exists gancho.endpoint_state (
    endpoint text primary key,
    consecutive_failures integer not null default 0,
    failing_since timestamptz,
    paused_until timestamptz,
    disabled_at timestamptz,
    disabled_reason text
);

-- The length of the current circuit-breaker pause, doubled by each failed probe.
alter table gancho.endpoint_state add column if not exists pause_ms double precision;

-- Every HTTP attempt, successful or not.
create table if not exists gancho.attempt (
    id bigint generated always as identity primary key,
    delivery_id bigint not null references gancho.delivery (id) on delete cascade,
    attempt integer not null,
    started_at timestamptz not null,
    status_code integer,
    latency_ms double precision not null,
    error text,
    response_body text
);

create index if not exists attempt_delivery on gancho.attempt (delivery_id);

-- The doorbell: 1 while a sidecar waits for work and wants a NOTIFY, 0 while
-- it is busy. A transaction that issues NOTIFY holds a cluster-wide lock from
-- its commit until the commit is flushed to disk, which puts every notifying
-- writer in a single line. Ringing only while a sidecar waits keeps writers
-- out of that line under load. A sequence is read and set outside any
-- transaction, so a sidecar's setval() is seen at once by every writer,
-- whatever its snapshot. The sidecar closes the gap between a writer that
-- read 0 and its commit by waiting for the transactions that were in
-- progress when it set 1 (see src/sidecar/doorbell.rs).
create sequence if not exists gancho.doorbell minvalue 0 maxvalue 1 start 0 no cycle;

-- The row-level trigger function, fired once per changed row. gancho.watch()
-- uses it on partitions, partitioned tables, inheritance trees and sources
-- that fire in replica mode, and for TRUNCATE on every table. Other tables
-- get gancho.capture_statement() below.
-- Arguments: source name, key columns, captured columns, and the columns that
-- are not captured and the columns that are not key, as gancho.watch() found
-- them at install time.
--
-- It reads the row through to_jsonb() and removes the other columns with the
-- jsonb "-" operator instead of naming columns. A column renamed or dropped
-- after install then yields no value instead of an error, and the shop's
-- write goes on. A column added after install is recorded too until the next
-- install; the sidecar drops it. It runs as its owner (security definer), so
-- the shop's roles need no privilege on the gancho schema.
--
-- Setting gancho.skip to 'on' in a session (set local gancho.skip = 'on')
-- makes its writes invisible to gancho, so a receiver that writes back to a
-- watched table does not start a loop of events.
create or replace function gancho.capture() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    old_row jsonb;
    new_row jsonb;
    old_values jsonb;
    new_values jsonb;
    old_key jsonb;
    new_key jsonb;
begin
    if current_setting('gancho.skip', true) = 'on' then
        return null;
    end if;

    if TG_OP = 'TRUNCATE' then
        insert into gancho.outbox (source, table_name, operation)
        values (TG_ARGV[0], TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'TRUNCATE');
        perform pg_notify('gancho', '');
        return null;
    end if;

    if TG_OP <> 'INSERT' then
        old_row := to_jsonb(OLD);
    end if;
    if TG_OP <> 'DELETE' then
        new_row := to_jsonb(NEW);
    end if;

    if TG_NARGS >= 5 then
        old_values := old_row - TG_ARGV[3]::text[];
        new_values := new_row - TG_ARGV[3]::text[];
        old_key := old_row - TG_ARGV[4]::text[];
        new_key := new_row - TG_ARGV[4]::text[];
    else
        -- Triggers installed by an older gancho pass no excluded columns:
        -- pick the captured columns one by one, which is slower.
        select coalesce(jsonb_object_agg(c, old_row -> c), '{}') into old_values from unnest(TG_ARGV[2]::text[]) c;
        select coalesce(jsonb_object_agg(c, new_row -> c), '{}') into new_values from unnest(TG_ARGV[2]::text[]) c;
        select jsonb_object_agg(c, old_row -> c) into old_key from unnest(TG_ARGV[1]::text[]) c;
        select jsonb_object_agg(c, new_row -> c) into new_key from unnest(TG_ARGV[1]::text[]) c;
        if TG_OP = 'INSERT' then
            old_values := null;
            old_key := null;
        elsif TG_OP = 'DELETE' then
            new_values := null;
            new_key := null;
        end if;
    end if;

    -- An update that changes no captured column and no key records nothing.
    if TG_OP = 'UPDATE' and old_values = new_values and old_key = new_key then
        return null;
    end if;

    insert into gancho.outbox (source, table_name, operation, key, old, new)
    values (TG_ARGV[0], TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_OP, coalesce(new_key, old_key), old_values, new_values);

    -- Read after the insert, so this transaction already has its id when it
    -- reads 0, and a sidecar that sets 1 afterwards waits for it. The payload
    -- is constant, so Postgres folds the notifications of one transaction into
    -- one. pg_sequence_last_value(), the function behind the pg_sequences
    -- view, costs a fraction of a SELECT on the sequence, and this runs once
    -- per changed row. It returns null until the first setval().
    if pg_sequence_last_value('gancho.doorbell'::regclass) = 1 then
        perform pg_notify('gancho', '');
    end if;
    return null;
end
$$;

-- The statement-level trigger function, used on plain tables. It fires once
-- per statement and reads the statement's changed rows from its transition
-- tables (gancho_old and gancho_new), so a statement that changes 100,000 rows
-- runs one function call and one set-based insert instead of 100,000 of each.
-- Arguments as for gancho.capture(). "offset 0" keeps Postgres from merging a
-- subquery into the query around it, which would compute to_jsonb() and the
-- projections once per reference instead of once per row.
--
-- Postgres fills the two transition tables of an UPDATE side by side, one
-- before-image and one after-image per updated row, so the rows at the same
-- position in each belong together. Pairing by position also holds when the
-- update changes the key.
create or replace function gancho.capture_statement() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    not_captured text[] := TG_ARGV[3];
    not_key text[] := TG_ARGV[4];
    changed_table text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
begin
    if current_setting('gancho.skip', true) = 'on' then
        return null;
    end if;

    if TG_OP = 'INSERT' then
        insert into gancho.outbox (source, table_name, operation, key, new)
        select TG_ARGV[0], changed_table, 'INSERT', after_image - not_key, after_image - not_captured
        from (select to_jsonb(inserted) as after_image from gancho_new inserted offset 0) captured;
    elsif TG_OP = 'DELETE' then
        insert into gancho.outbox (source, table_name, operation, key, old)
        select TG_ARGV[0], changed_table, 'DELETE', before_image - not_key, before_image - not_captured
        from (select to_jsonb(deleted) as before_image from gancho_old deleted offset 0) captured;
    else
        -- The images are projected before they are paired, so columns that
        -- are not captured (a long description, say) never travel further.
        -- The pairing is a join on position rather than an aggregate, which
        -- would fail the shop's UPDATE once its rows add up to 1 GB.
        insert into gancho.outbox (source, table_name, operation, key, old, new)
        select TG_ARGV[0], changed_table, 'UPDATE', after_rows.key_values, before_rows.captured_values, after_rows.captured_values
        from (
            select row_number() over () as position, captured_values, key_values
            from (
                select image - not_captured as captured_values, image - not_key as key_values
                from (select to_jsonb(deleted) as image from gancho_old deleted offset 0) images
                offset 0
            ) projected
        ) before_rows
        join (
            select row_number() over () as position, captured_values, key_values
            from (
                select image - not_captured as captured_values, image - not_key as key_values
                from (select to_jsonb(inserted) as image from gancho_new inserted offset 0) images
                offset 0
            ) projected
        ) after_rows using (position)
        -- An update that changes no captured column and no key records nothing.
        where before_rows.captured_values <> after_rows.captured_values
           or before_rows.key_values <> after_rows.key_values;
    end if;

    -- As in gancho.capture(): read after the insert, and only when it wrote.
    if found and pg_sequence_last_value('gancho.doorbell'::regclass) = 1 then
        perform pg_notify('gancho', '');
    end if;
    return null;
end
$$;

-- Remove the triggers of one source and forget it. Does nothing for an
-- unknown source, and tolerates a table that no longer exists.
create or replace function gancho.unwatch(source_name text) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    watched_row gancho.watched;
    target regclass;
begin
    select * into watched_row from gancho.watched where source = source_name;
    if not found then
        return;
    end if;

    target := to_regclass(format('%I.%I', watched_row.table_schema, watched_row.table_name));
    if target is not null then
        execute format('drop trigger if exists %I on %s', 'gancho_' || source_name, target);
        execute format('drop trigger if exists %I on %s', 'gancho_' || source_name || '_insert', target);
        execute format('drop trigger if exists %I on %s', 'gancho_' || source_name || '_update', target);
        execute format('drop trigger if exists %I on %s', 'gancho_' || source_name || '_delete', target);
        execute format('drop trigger if exists %I on %s', 'gancho_' || source_name || '_truncate', target);
    end if;

    delete from gancho.watched where source = source_name;
end
$$;

-- Install (or reinstall) the capture triggers of one source on one table.
-- Raises an error naming the column when a key or captured column does not
-- exist, so a typo fails at install time, not silently at run time. With
-- fire_always, the triggers also fire under session_replication_role =
-- replica, which restores and replication tools set.
drop function if exists gancho.watch(text, regclass, text[], text[]);
create or replace function gancho.watch(
    source_name text, target regclass, key_columns text[], columns text[], fire_always boolean default false
) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    missing text;
    not_captured text[];
    not_key text[];
    schema_name text;
    relation_name text;
    per_statement boolean;
    triggers text[];
    suffix text;
begin
    if source_name !~ '^[a-z0-9_-]{1,50}$' then
        raise exception 'invalid gancho source name "%"', source_name
            using hint = 'Use 1 to 50 lowercase letters, digits, "_" or "-".';
    end if;

    if coalesce(cardinality(key_columns), 0) = 0 then
        raise exception 'gancho source "%" has no key columns', source_name
            using hint = 'Pass the primary key columns, for example ''{id}''.';
    end if;

    select c into missing
    from unnest(key_columns || columns) c
    where not exists (
        select 1 from pg_attribute a
        where a.attrelid = target and a.attname = c and a.attnum > 0 and not a.attisdropped
    )
    limit 1;
    if missing is not null then
        raise exception 'column "%" does not exist in table %', missing, target
            using hint = 'Check the spelling and case of the column name in the gancho source "' || source_name || '".';
    end if;

    select n.nspname, c.relname into schema_name, relation_name
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where c.oid = target;

    -- The trigger removes these from the row, which is cheaper than picking
    -- the captured columns one by one.
    select coalesce(array_agg(a.attname::text order by a.attnum) filter (where a.attname <> all (columns)), '{}'),
           coalesce(array_agg(a.attname::text order by a.attnum) filter (where a.attname <> all (key_columns)), '{}')
    into not_captured, not_key
    from pg_attribute a
    where a.attrelid = target and a.attnum > 0 and not a.attisdropped;

    perform gancho.unwatch(source_name);

    -- Statement-level triggers see a statement's rows only when the
    -- statement names this table. A partition also changes through its
    -- parent, a partitioned table through its partitions, and an inheritance
    -- child through its parent, so those tables get the row-level trigger.
    -- It fires for the rows stored in its table whichever statement changes
    -- them. Postgres copies it to partitions but not to inheritance children,
    -- so a child needs a source of its own. fire_always sources get the
    -- row-level trigger too, because logical replication's apply worker
    -- fires row triggers only.
    select not fire_always and c.relkind = 'r' and not c.relispartition
           and not exists (select 1 from pg_inherits i where i.inhrelid = target or i.inhparent = target)
    into per_statement
    from pg_class c
    where c.oid = target;

    if per_statement then
        execute format(
            'create trigger %I after insert on %s referencing new table as gancho_new'
            ' for each statement execute function gancho.capture_statement(%L, %L, %L, %L, %L)',
            'gancho_' || source_name || '_insert', target, source_name, key_columns, columns, not_captured, not_key);
        execute format(
            'create trigger %I after update on %s referencing old table as gancho_old new table as gancho_new'
            ' for each statement execute function gancho.capture_statement(%L, %L, %L, %L, %L)',
            'gancho_' || source_name || '_update', target, source_name, key_columns, columns, not_captured, not_key);
        execute format(
            'create trigger %I after delete on %s referencing old table as gancho_old'
            ' for each statement execute function gancho.capture_statement(%L, %L, %L, %L, %L)',
            'gancho_' || source_name || '_delete', target, source_name, key_columns, columns, not_captured, not_key);
        triggers := array['_insert', '_update', '_delete', '_truncate'];
    else
        execute format(
            'create trigger %I after insert or update or delete on %s for each row execute function gancho.capture(%L, %L, %L, %L, %L)',
            'gancho_' || source_name, target, source_name, key_columns, columns, not_captured, not_key);
        triggers := array['', '_truncate'];
    end if;
    execute format(
        'create trigger %I after truncate on %s for each statement execute function gancho.capture(%L, %L, %L)',
        'gancho_' || source_name || '_truncate', target, source_name, key_columns, columns);
    if fire_always then
        foreach suffix in array triggers loop
            execute format('alter table %s enable always trigger %I', target, 'gancho_' || source_name || suffix);
        end loop;
    end if;

    insert into gancho.watched (source, table_schema, table_name, key_columns, columns, fire_always)
    values (source_name, schema_name, relation_name, key_columns, columns, fire_always);
end
$$;
