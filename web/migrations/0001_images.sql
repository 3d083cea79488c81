-- Image metadata. The same text runs on SQLite and PostgreSQL: only types, constraints and
-- syntax that both accept (BIGINT is an INTEGER column in SQLite; times are integers, not
-- dialect-specific timestamp types).
CREATE TABLE images (
    -- The image key visitors choose; validated by the web layer before it gets here.
    key TEXT PRIMARY KEY,
    -- Bytes in the object store.
    size BIGINT NOT NULL CHECK (size >= 0),
    -- As sniffed from the bytes at upload, e.g. image/png.
    content_type TEXT NOT NULL,
    -- Lowercase hex SHA-256 of the bytes: the HTTP ETag, without its quotes.
    etag TEXT NOT NULL,
    -- Microseconds since the Unix epoch (UTC) of the latest upload; orders the listing.
    uploaded_at BIGINT NOT NULL,
    -- 1 on the first upload of a key, one more at every re-upload.
    generation BIGINT NOT NULL CHECK (generation >= 1),
    -- Name of the object holding this version's bytes; unique to the version, so a re-upload
    -- never overwrites an object a reader may be fetching.
    object TEXT NOT NULL,
    -- The object the latest re-upload replaced, returned by the upsert so the writer can delete
    -- it; NULL after a first upload.
    replaced_object TEXT
);

-- Newest-first listing with a keyset cursor on (uploaded_at, key); both databases scan an
-- ascending index backwards.
CREATE INDEX images_newest ON images (uploaded_at, key);
