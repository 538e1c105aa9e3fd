"""storage-builder: per-tenant snapshots of PostgreSQL in S3, kept current from CDC."""
