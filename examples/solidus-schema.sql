-- The tables of a Solidus/Spree shop that gancho watches, as Solidus creates
-- them (trimmed to the columns that matter here), plus `promised_at`, the
-- promised delivery time that many shops add to shipments, and
-- `warehouse_bins`, a shop's own table of where each variant is shelved.
--
-- The tests load this file into a fresh database; `gancho demo` loads it into
-- a schema of its own.

create table spree_stock_locations (
    id bigserial primary key,
    name text not null
);

create table spree_variants (
    id bigserial primary key,
    sku text not null
);

create table spree_stock_items (
    id bigserial primary key,
    stock_location_id bigint not null references spree_stock_locations (id),
    variant_id bigint not null references spree_variants (id),
    count_on_hand integer not null default 0,
    backorderable boolean not null default false,
    updated_at timestamp(6) without time zone not null default now(),
    unique (variant_id, stock_location_id)
);

create table spree_orders (
    id bigserial primary key,
    number varchar(32) not null unique,
    email varchar,
    state varchar not null default 'cart',
    shipment_state varchar,
    completed_at timestamp(6) without time zone,
    updated_at timestamp(6) without time zone not null default now()
);

create table spree_line_items (
    id bigserial primary key,
    order_id bigint not null references spree_orders (id),
    variant_id bigint not null references spree_variants (id),
    quantity integer not null,
    price numeric(10, 2) not null
);

create table spree_shipments (
    id bigserial primary key,
    order_id bigint not null references spree_orders (id),
    number varchar not null unique,
    state varchar not null default 'pending',
    tracking varchar,
    shipped_at timestamp(6) without time zone,
    promised_at timestamp with time zone
);

create table warehouse_bins (
    stock_location_id bigint not null references spree_stock_locations (id),
    variant_id bigint not null references spree_variants (id),
    section text not null,
    primary key (stock_location_id, variant_id)
);
