"""One repository per table family; `storage.db.Database` combines them over one engine."""
