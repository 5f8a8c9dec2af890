"""The universal worker's mechanism: device memory as a pool of pages, mapped into slots."""
