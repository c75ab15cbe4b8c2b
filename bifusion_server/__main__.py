from .main import main

# Guarded: model instance processes ('spawn') import this module again as __mp_main__.
if __name__ == "__main__":
    main()
