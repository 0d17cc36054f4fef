package mcp

import (
	"os/exec"
	"syscall"
)

// setDeathSignal makes a stdio server die with the dispatcher even when the
// dispatcher is killed (SIGKILL) and cannot close it.
func setDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
