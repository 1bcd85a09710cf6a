module smolconvert/tests/go

go 1.19
