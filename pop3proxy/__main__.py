from pop3proxy.cli import main

raise SystemExit(main())
