"""The data path: shards, downloads, the synthetic world, chat tasks, the tokenizing loader."""
