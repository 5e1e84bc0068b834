"""What lives on disk: model directories, training runs, downloads, size names, atomic writes."""
