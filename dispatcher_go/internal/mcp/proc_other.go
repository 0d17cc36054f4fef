//go:build !linux

package mcp

import "os/exec"

// setDeathSignal is Linux only; elsewhere a stdio server outlives a killed
// dispatcher until its stdin closes.
func setDeathSignal(*exec.Cmd) {}
