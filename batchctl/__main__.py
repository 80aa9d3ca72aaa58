from batchctl.cli import entry

entry()
