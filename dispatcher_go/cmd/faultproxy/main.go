// Command faultproxy is a test helper: one TCP proxy (toxiproxy, used as a
// library) between a commander and the dispatcher, plus toxiproxy's HTTP API
// on a free loopback port to add and remove faults (latency, bandwidth,
// reset_peer, timeout = black hole) while the link is in use.
//
//	faultproxy --upstream 127.0.0.1:50051 --addr-file proxy.addr --api-addr-file api.addr
//
// The proxy is named "link"; add a toxic with
// POST /proxies/link/toxics {"type":"latency","stream":"downstream","attributes":{"latency":300}}.
// It is for the fault-injection tests (tests/test_faults.py) only and must not
// be deployed: it has no authentication.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/gorilla/mux"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/agentdispatch/dispatcher/internal/addrfile"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "faultproxy:", err)
		os.Exit(1)
	}
}

func run() error {
	listen := flag.String("listen", "127.0.0.1:0", "address the proxy listens on")
	upstream := flag.String("upstream", "", "address the proxy forwards to (required)")
	api := flag.String("api-listen", "127.0.0.1:0", "address of toxiproxy's HTTP API (loopback)")
	addrFile := flag.String("addr-file", "", "the proxy's actual address is written here")
	apiAddrFile := flag.String("api-addr-file", "", "the API's actual address is written here")
	flag.Parse()
	if *upstream == "" {
		return errors.New("--upstream is required")
	}

	logger := zerolog.New(os.Stderr).With().Timestamp().Logger().Level(zerolog.InfoLevel)
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), logger)
	proxy := toxiproxy.NewProxy(server, "link", *listen, *upstream)
	if err := server.Collection.Add(proxy, true); err != nil {
		return fmt.Errorf("start proxy: %w", err)
	}

	r := mux.NewRouter()
	r.HandleFunc("/reset", server.ResetState).Methods("POST")
	r.HandleFunc("/proxies", server.ProxyIndex).Methods("GET")
	r.HandleFunc("/proxies/{proxy}", server.ProxyShow).Methods("GET")
	r.HandleFunc("/proxies/{proxy}", server.ProxyUpdate).Methods("POST")
	r.HandleFunc("/proxies/{proxy}/toxics", server.ToxicIndex).Methods("GET")
	r.HandleFunc("/proxies/{proxy}/toxics", server.ToxicCreate).Methods("POST")
	r.HandleFunc("/proxies/{proxy}/toxics/{toxic}", server.ToxicUpdate).Methods("POST")
	r.HandleFunc("/proxies/{proxy}/toxics/{toxic}", server.ToxicDelete).Methods("DELETE")
	ln, err := net.Listen("tcp", *api)
	if err != nil {
		return fmt.Errorf("api listen: %w", err)
	}
	srv := &http.Server{Handler: r, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()

	if *addrFile != "" {
		if err := addrfile.Write(*addrFile, proxy.Listen); err != nil {
			return err
		}
		defer os.Remove(*addrFile)
	}
	if *apiAddrFile != "" {
		if err := addrfile.Write(*apiAddrFile, ln.Addr().String()); err != nil {
			return err
		}
		defer os.Remove(*apiAddrFile)
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	_ = srv.Close()
	proxy.Stop()
	return nil
}
