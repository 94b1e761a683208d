"""``python -m dpo_service`` is ``dpo-service``."""

from dpo_service.cli import main

raise SystemExit(main())
