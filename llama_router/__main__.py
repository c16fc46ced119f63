from llama_router.cli import main

raise SystemExit(main())
