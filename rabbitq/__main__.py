from rabbitq.cli import main

main()
