// vcsim: the govmomi vSphere simulator as a program, for the appliance's connector tests.
//
// Debian's golang-github-vmware-govmomi-dev ships the simulator library but not the vcsim
// command, so this small main builds one offline from packaged sources only (build.sh).
// It serves a vCenter model (SOAP on /sdk, the vAPI REST endpoint on /rest for tags) on the
// given address with explicit credentials and, when given, a certificate the test made
// (the library's built-in localhost certificate has a key too weak for default TLS clients).
// It prints one line `event=ready url=URL` once it accepts connections and stops on SIGTERM.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator" // registers the /rest tagging endpoints
)

func main() {
	listen := flag.String("l", "127.0.0.1:8989", "listen address host:port")
	username := flag.String("username", "user", "the one accepted SOAP user name")
	password := flag.String("password", "pass", "its password")
	certFile := flag.String("tlscert", "", "PEM certificate (default: the library's localhost one)")
	keyFile := flag.String("tlskey", "", "PEM private key of -tlscert")
	clusterHosts := flag.Int("host", 3, "ESXi hosts per cluster")
	machines := flag.Int("vm", 2, "VMs per resource pool")
	folders := flag.Int("folder", 0, "folders to nest each datacenter's inventory in")
	flag.Parse()

	model := simulator.VPX()
	model.ClusterHost = *clusterHosts
	model.Machine = *machines
	model.Folder = *folders
	if err := model.Create(); err != nil {
		log.Fatalf("event=model_failed error=%v", err)
	}
	defer model.Remove()

	model.Service.RegisterEndpoints = true
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	model.Service.TLS = new(tls.Config)
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("event=tls_failed error=%v", err)
		}
		model.Service.TLS.Certificates = []tls.Certificate{cert}
	}
	server := model.Service.NewServer()
	defer server.Close()

	u := *server.URL
	u.User = nil
	fmt.Printf("event=ready url=%s\n", u.String())
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
