"""Regenerate migration 0001 from engine/store/tables.py while the schema is unreleased.

Once a release ships, schema changes get new revisions instead (alembic revision --autogenerate).
Usage: python scripts/regen_migration.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config

from engine.store.db import MIGRATIONS, Store

VERSION = MIGRATIONS / "versions" / "0001_journal_and_domain_store.py"


def main() -> None:
    VERSION.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        store = Store(f"sqlite:///{scratch}/empty.db")
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.set_main_option("sqlalchemy.url", store.url)
        with store.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.revision(config, message="journal and domain store", autogenerate=True, rev_id="0001")
        store.dispose()
    generated = next((MIGRATIONS / "versions").glob("0001_*.py"))
    if generated != VERSION:
        generated.rename(VERSION)
    print(f"wrote {VERSION}")


if __name__ == "__main__":
    main()
