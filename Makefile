# Convenience wrappers around ./dev (the README's commands).
.PHONY: run test build deps
run:
	./dev run
test:
	./dev test
build:
	./dev build
deps:
	./dev deps
