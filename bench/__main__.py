import sys

if "--row-lora" in sys.argv[1:]:  # mixed-adapter row ops (bench/row_lora.py, which takes more options)
    from .row_lora import main as row_lora_main

    row_lora_main([a for a in sys.argv[1:] if a != "--row-lora"])
elif "--many-adapters" in sys.argv[1:]:  # 4 named adapters, one vs mixed per batch (bench/many_adapters.py)
    from .many_adapters import main as many_adapters_main

    many_adapters_main([a for a in sys.argv[1:] if a != "--many-adapters"])
else:
    from .harness import main

    main()
