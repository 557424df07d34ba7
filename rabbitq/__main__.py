from rabbitq._cli import main

main()
