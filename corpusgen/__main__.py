from corpusgen.cli import main

main()
