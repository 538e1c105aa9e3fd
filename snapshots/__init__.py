"""The snapshot core shared by every job: the segment and manifest formats, the object
store, the version registry in Redis, publishing, reading and garbage collection."""
