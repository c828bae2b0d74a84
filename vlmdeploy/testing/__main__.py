"""`python -m vlmdeploy.testing ...` is the checkpoint generator's CLI."""

from vlmdeploy.testing.checkpoint import main

if __name__ == '__main__':
    main()
