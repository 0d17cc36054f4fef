// Package addrfile publishes a server's listen address in a file (the
// --addr-file flag of the dispatcher and scriptedllm), for the scripts and
// tests that start a server on port 0 and poll for where it listens.
//
// What it must not do: anything but write that file (no listening, no
// signals, no removal: the server removes it when it wants to).
package addrfile

import (
	"os"
	"path/filepath"
)

// Write writes addr and a newline to path through a temporary file in the
// same directory and a rename, so that a reader polling the path never
// sees a partial address.
func Write(path, addr string) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".addr-*")
	if err != nil {
		return err
	}
	if _, err := tmp.WriteString(addr + "\n"); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), path)
}
