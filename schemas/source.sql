-- The sample source schema: the five dataset tables of schemas/datasets.py, the row version
-- the database maintains on them, and the publication Debezium streams them from.
--
-- Idempotent: applying it again changes nothing. Run it in one transaction
-- (`psql -1 -f source.sql`, or `storage-builder demo schema`); the advisory lock below makes
-- two concurrent runs wait for each other instead of failing on CREATE OR REPLACE.

SELECT pg_advisory_xact_lock(hashtext('storage_builder.source_schema'));

-- One sequence shared by every table: a row's (key, row_version) pair then names one write
-- of that row, and the checksums of bootstrap and reconciliation compare exactly that.
CREATE SEQUENCE IF NOT EXISTS public.row_version_seq AS bigint;

-- Every insert and every update gets a fresh version from the sequence, whatever the
-- statement says: an UPDATE that leaves row_version out still bumps it, and one that sets it
-- (or an INSERT that passes a stale value) cannot make a changed row look unchanged.
CREATE OR REPLACE FUNCTION public.assign_row_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.row_version := nextval('public.row_version_seq');
    RETURN NEW;
END
$$;

-- The primary key is (client_id, id): one index serves a client's key-range scans, and the
-- replica identity (DEFAULT = the primary key) makes every delete event carry the client.
--
-- The key INCLUDEs row_version, so the checksum query of reconciliation, an aggregate of
-- hash(id, row_version) over one client's key ranges, is an index-only scan that never
-- visits the heap (once vacuum has marked the pages all-visible). A separate covering index
-- would cost a second index on every write; updates are not HOT either way, since
-- row_version changes on every update.

CREATE TABLE IF NOT EXISTS public.raw_data (
    id            bigint        NOT NULL,
    client_id     bigint        NOT NULL CHECK (client_id > 0),
    entity_id     bigint        NOT NULL,
    data_item_id  bigint        NOT NULL,
    period        date          NOT NULL,
    value         numeric(20,6),
    currency      text,
    recorded_at   timestamptz   NOT NULL,
    row_version   bigint        NOT NULL DEFAULT nextval('public.row_version_seq'),
    CONSTRAINT raw_data_pkey PRIMARY KEY (client_id, id) INCLUDE (row_version)
);

CREATE TABLE IF NOT EXISTS public.entities (
    id            bigint        NOT NULL,
    client_id     bigint        NOT NULL CHECK (client_id > 0),
    parent_id     bigint,
    name          text          NOT NULL,
    kind          text          NOT NULL,
    attributes    jsonb,
    active        boolean       NOT NULL,
    valid_from    date          NOT NULL,
    updated_at    timestamptz   NOT NULL,
    row_version   bigint        NOT NULL DEFAULT nextval('public.row_version_seq'),
    CONSTRAINT entities_pkey PRIMARY KEY (client_id, id) INCLUDE (row_version)
);

CREATE TABLE IF NOT EXISTS public.data_items (
    id            bigint        NOT NULL,
    client_id     bigint        NOT NULL CHECK (client_id > 0),
    code          text          NOT NULL,
    name          text          NOT NULL,
    unit          text,
    decimals      integer       NOT NULL,
    is_input      boolean       NOT NULL,
    metadata      jsonb,
    updated_at    timestamptz   NOT NULL,
    row_version   bigint        NOT NULL DEFAULT nextval('public.row_version_seq'),
    CONSTRAINT data_items_pkey PRIMARY KEY (client_id, id) INCLUDE (row_version)
);

CREATE TABLE IF NOT EXISTS public.formulas (
    id            bigint        NOT NULL,
    client_id     bigint        NOT NULL CHECK (client_id > 0),
    name          text          NOT NULL,
    expression    text          NOT NULL,
    weight        numeric(18,8),
    valid_from    date          NOT NULL,
    valid_to      date,
    enabled       boolean       NOT NULL,
    parameters    jsonb,
    updated_at    timestamptz   NOT NULL,
    row_version   bigint        NOT NULL DEFAULT nextval('public.row_version_seq'),
    CONSTRAINT formulas_pkey PRIMARY KEY (client_id, id) INCLUDE (row_version)
);

CREATE TABLE IF NOT EXISTS public.formula_associations (
    id            bigint        NOT NULL,
    client_id     bigint        NOT NULL CHECK (client_id > 0),
    formula_id    bigint        NOT NULL,
    entity_id     bigint        NOT NULL,
    data_item_id  bigint,
    priority      integer       NOT NULL,
    factor        numeric(12,4),
    effective_on  date          NOT NULL,
    created_at    timestamptz   NOT NULL,
    row_version   bigint        NOT NULL DEFAULT nextval('public.row_version_seq'),
    CONSTRAINT formula_associations_pkey PRIMARY KEY (client_id, id) INCLUDE (row_version)
);

-- The version triggers, one per table. BEFORE INSERT as well as BEFORE UPDATE, so an insert
-- cannot forge its version either; the DEFAULT above still fills the column when triggers
-- are switched off (session_replication_role = replica).
CREATE OR REPLACE TRIGGER raw_data_row_version
    BEFORE INSERT OR UPDATE ON public.raw_data
    FOR EACH ROW EXECUTE FUNCTION public.assign_row_version();
CREATE OR REPLACE TRIGGER entities_row_version
    BEFORE INSERT OR UPDATE ON public.entities
    FOR EACH ROW EXECUTE FUNCTION public.assign_row_version();
CREATE OR REPLACE TRIGGER data_items_row_version
    BEFORE INSERT OR UPDATE ON public.data_items
    FOR EACH ROW EXECUTE FUNCTION public.assign_row_version();
CREATE OR REPLACE TRIGGER formulas_row_version
    BEFORE INSERT OR UPDATE ON public.formulas
    FOR EACH ROW EXECUTE FUNCTION public.assign_row_version();
CREATE OR REPLACE TRIGGER formula_associations_row_version
    BEFORE INSERT OR UPDATE ON public.formula_associations
    FOR EACH ROW EXECUTE FUNCTION public.assign_row_version();

-- The publication Debezium's pgoutput plugin reads. Created here, with exactly these tables,
-- so the connector never falls back to publishing every table of the database; a table
-- missing from an older publication is added.
DO $$
DECLARE
    dataset text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'storage_builder_pub') THEN
        CREATE PUBLICATION storage_builder_pub
            FOR TABLE public.raw_data, public.entities, public.data_items, public.formulas,
                      public.formula_associations
            WITH (publish = 'insert, update, delete, truncate');
    ELSE
        ALTER PUBLICATION storage_builder_pub SET (publish = 'insert, update, delete, truncate');
        FOREACH dataset IN ARRAY ARRAY['raw_data', 'entities', 'data_items', 'formulas',
                                       'formula_associations'] LOOP
            IF NOT EXISTS (
                SELECT FROM pg_publication_tables
                WHERE pubname = 'storage_builder_pub' AND schemaname = 'public'
                  AND tablename = dataset
            ) THEN
                EXECUTE format('ALTER PUBLICATION storage_builder_pub ADD TABLE public.%I',
                               dataset);
            END IF;
        END LOOP;
    END IF;
END
$$;
