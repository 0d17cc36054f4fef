package mcp

import (
	"bytes"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Config is the MCP servers file (--mcp-servers): the servers whose tools
// the broker serves. YAML or JSON; the key is "mcpServers" (the layout most
// MCP clients use) or "servers":
//
//	mcpServers:
//	  files:                           # tools: mcp.files.<tool>
//	    command: /usr/bin/mcp-files    # stdio: the command and its arguments
//	    args: [--root, /srv/data]
//	    env: {LOG_LEVEL: warn}         # added to PATH, HOME, LANG, TMPDIR
//	    cwd: /srv
//	    timeout: 2m                    # per call (default: --tool-timeout)
//	  search:
//	    url: https://search.internal/mcp   # streamable HTTP
//	    headers: {Authorization: "Bearer ..."}
type Config struct {
	Servers map[string]ServerConfig
}

// ServerConfig is one MCP server: a stdio command or a streamable-HTTP URL.
type ServerConfig struct {
	Command string            `yaml:"command"`
	Args    []string          `yaml:"args"`
	Env     map[string]string `yaml:"env"`
	Cwd     string            `yaml:"cwd"`
	URL     string            `yaml:"url"`
	Headers map[string]string `yaml:"headers"`
	// Timeout bounds each call of the server's tools (0: the broker's
	// default, --tool-timeout).
	Timeout time.Duration `yaml:"timeout"`
	// Disabled keeps the entry without running it.
	Disabled bool `yaml:"disabled"`
}

// equal reports whether two server configurations are the same (a changed
// one is restarted on reload, an equal one is left running).
func (c ServerConfig) equal(o ServerConfig) bool {
	return fmt.Sprintf("%#v", c) == fmt.Sprintf("%#v", o)
}

// maxServerName keeps mcp.<server>.<tool> within the broker's 128 characters
// with room for the tool.
const maxServerName = 32

var serverName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,32}$`)

type fileSpec struct {
	MCPServers map[string]ServerConfig `yaml:"mcpServers"`
	Servers    map[string]ServerConfig `yaml:"servers"`
}

// ParseConfig parses and checks an MCP servers file.
func ParseConfig(src []byte) (Config, error) {
	var spec fileSpec
	dec := yaml.NewDecoder(bytes.NewReader(src))
	dec.KnownFields(true)
	if err := dec.Decode(&spec); err != nil && strings.TrimSpace(string(src)) != "" {
		return Config{}, fmt.Errorf("mcp servers file: %w", err)
	}
	if spec.MCPServers != nil && spec.Servers != nil {
		return Config{}, fmt.Errorf("mcp servers file: give either mcpServers or servers, not both")
	}
	servers := spec.MCPServers
	if servers == nil {
		servers = spec.Servers
	}
	cfg := Config{Servers: make(map[string]ServerConfig, len(servers))}
	for name, s := range servers {
		if !serverName.MatchString(name) {
			return Config{}, fmt.Errorf("mcp server %q: a name is 1..%d letters, digits, _ or -", name, maxServerName)
		}
		switch {
		case s.Command != "" && s.URL != "":
			return Config{}, fmt.Errorf("mcp server %q: give either command (stdio) or url (HTTP), not both", name)
		case s.Command == "" && s.URL == "":
			return Config{}, fmt.Errorf("mcp server %q: give command (stdio) or url (HTTP)", name)
		case s.URL != "":
			u, err := url.Parse(s.URL)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				return Config{}, fmt.Errorf("mcp server %q: url must be an http(s) URL", name)
			}
			if len(s.Args) > 0 || len(s.Env) > 0 || s.Cwd != "" {
				return Config{}, fmt.Errorf("mcp server %q: args, env and cwd are for a command", name)
			}
		default:
			if len(s.Headers) > 0 {
				return Config{}, fmt.Errorf("mcp server %q: headers are for a url", name)
			}
		}
		if s.Timeout < 0 {
			return Config{}, fmt.Errorf("mcp server %q: negative timeout", name)
		}
		cfg.Servers[name] = s
	}
	return cfg, nil
}

// LoadConfig reads and parses the MCP servers file at path.
func LoadConfig(path string) (Config, error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("read mcp servers file: %w", err)
	}
	return ParseConfig(src)
}
